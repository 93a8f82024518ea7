-- The pytest plugin's throwaway databases: one per test, cloned from a migrated template.

-- name: create_database
CREATE DATABASE {database}

-- name: create_database_from_template
CREATE DATABASE {database} TEMPLATE {template}

-- name: drop_database
DROP DATABASE IF EXISTS {database} WITH (FORCE)
