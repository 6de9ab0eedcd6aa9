"""Stages 2-3, the IR (CellSpec -> FusedPlan -> FusedPlan): the plan's dataclasses (:mod:`.plan`),
the analysis that builds it (:mod:`.analysis`) and the plan -> plan passes (:mod:`.passes`)."""
