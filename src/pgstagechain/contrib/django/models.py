"""No models: pgstagechain's tables live in the ``pgstagechain`` schema and are managed by
its own numbered migrations. This module exists so that Django sends the app its
``post_migrate`` signal."""
