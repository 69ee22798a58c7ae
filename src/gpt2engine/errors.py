"""The one exception type for mistakes a user can make (bad path, bad checkpoint, bad input).

The CLI turns it into a single line on stderr and a non-zero exit; the server into an
OpenAI-style error body. Anything else that escapes is a bug in the engine.
"""


class GPT2EngineError(Exception):
    """A user-facing error whose message is complete on its own, in one line."""
