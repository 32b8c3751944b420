"""Built-in rule presets for ``dsrewrite convert`` (TOML files), shipped as ``dsrewrite.presets``."""


def names() -> list[str]:
    """The built-in presets: every ``*.toml`` in this folder, by name."""
    import importlib.resources

    return sorted(p.name[:-5] for p in importlib.resources.files(__name__).iterdir() if p.name.endswith(".toml"))
