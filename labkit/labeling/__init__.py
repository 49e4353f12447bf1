"""Human and programmatic labels: the label store (SQLite, no torch), the comparisons queue, programmatic
labelers and the online procedure. Import from the modules: the store must stay importable without torch."""
