"""Built-in rule presets for ``dsrewrite convert`` (TOML files), shipped as ``dsrewrite.presets``."""
