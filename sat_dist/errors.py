"""The one exception type for problems a user can fix (bad flags, configs, files).

Entry points turn it into a single line on stderr and a non-zero exit; nothing else in the
package prints tracebacks for bad input.
"""


class SatDistError(Exception):
    """A user-facing error: the message names the problem and, where possible, the fix."""


def fail_field(section: str, field: str, value, allowed: str) -> "SatDistError":
    """Build the standard one-line error for a bad config value."""
    return SatDistError(f"{section}.{field}: got {value!r}; allowed: {allowed}")
