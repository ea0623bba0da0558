"""The one error type shown to users.

Library code raises :class:`UserError` for anything caused by the user's input (a file, an option, a folder).
The CLI prints its message as one line and exits with :data:`EXIT_USAGE`; nothing else becomes a traceback.
"""

EXIT_USAGE = 2


class UserError(Exception):
    """Bad input from the user: the message names the file or option and says what is wrong."""
