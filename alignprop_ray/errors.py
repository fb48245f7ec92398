"""User-facing errors: one line, exit status 2, no traceback (the CLI catches these)."""


class UserError(Exception):
    """Bad input from the user (config, CLI argument, file, weights). The message is shown as is."""


class ConfigError(UserError):
    """One or more invalid config fields; each message line names the dotted field."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))
