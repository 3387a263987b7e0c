"""Below everything: errors, config dataclasses and their coercion, the registry of model transforms,
the name-selection vocabulary, files written atomically, threads, devices and progress."""
