"""Storage: typed models, migrations, the group-commit writer and the repository of queries."""
