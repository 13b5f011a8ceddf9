"""An example of a user's own model family for Strata (spec.model.family: custom)."""
