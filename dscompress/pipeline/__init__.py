"""Steps over artifacts (one registry of configs and handlers), recipes of steps, and runs of recipes
that resume where they stopped."""
