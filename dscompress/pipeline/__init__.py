"""Steps over artifacts (a model transform applied to an artifact's model with its history, or a
handler for a step that measures), recipes of steps, and runs of recipes that resume where they
stopped."""
