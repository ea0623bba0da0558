"""The one error type shown to users.

Library code raises :class:`UserError` for anything caused by the user's input (a file, an option, a folder).
The CLI prints its message as one line and exits with :data:`EXIT_USAGE`; nothing else becomes a traceback.
"""

EXIT_USAGE = 2


class UserError(Exception):
    """Bad input from the user: the message names the file or option and says what is wrong."""


class OptionError(ValueError):
    """A method option out of range: ``option`` is its name, ``reason`` what is wrong (the configuration reports
    it as ``config key 'method.<option>' <reason>``)."""

    def __init__(self, option: str, reason: str) -> None:
        super().__init__(f"{option} {reason}")
        self.option, self.reason = option, reason


class Incompatible(Exception):
    """A method cannot run with this network, configuration or data (e.g. it hooks U-Net blocks, or its views
    need 3-D volumes): one line naming what to change. Any other exception raised while a run is assembled is a
    bug and surfaces as such."""
