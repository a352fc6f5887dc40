"""The configuration: its models, the loader, validation in a child, migrations, diffs."""
