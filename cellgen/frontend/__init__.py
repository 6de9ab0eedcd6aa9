"""Stage 1, the front end (spec file -> CellSpec): the DSL a spec file writes (:mod:`.dsl`) and
the loader that runs and validates it (:mod:`.spec`)."""
