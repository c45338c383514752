"""The one exception type for problems with the user's input.

The CLI prints ``str(error)`` as a single line and exits with status 2; everything else is a bug
(exit 1). Messages name the thing that is wrong and what was expected, e.g.
``"masks/0001.png: label value 150 >= num_classes 150 and not ignore_index 255"``.
"""


class UserError(Exception):
    """Bad path, spec, config, file or argument supplied by the user."""
