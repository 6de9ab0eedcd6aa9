"""Stage 4, code generation (FusedPlan -> module text): the SymPy printers (:mod:`.printing`), the
module's template context and Jinja environment (:mod:`.render`) and the import check of
the texts (:mod:`.verify`). Each backend adds its own context (:mod:`cellgen.backends`)."""
