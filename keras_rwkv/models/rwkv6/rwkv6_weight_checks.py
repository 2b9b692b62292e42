"""Checks on weights as a preset is loaded: an unreadable weights file
names itself and says what to do; NaN or infinite weights (a damaged file
or a diverged run) are refused, naming the variables, unless
`KERAS_RWKV_ALLOW_NON_FINITE=1`."""

import os

from keras import ops

from keras_rwkv.utils import settings

ALLOW_NON_FINITE_ENV_VAR = "KERAS_RWKV_ALLOW_NON_FINITE"


class PresetLoadError(OSError):
    """A preset's weights cannot be used; the message says what to do."""


def remedy(filepath):
    directory = os.path.dirname(os.path.abspath(os.fspath(filepath)))
    return (
        f"Delete {directory} and load it again (a named preset is then "
        "downloaded and converted anew), or convert the checkpoint again."
    )


def load_checked(load, filepath, variables):
    """Runs `load(filepath)`, then checks `variables` are finite."""
    try:
        load(filepath)
    except (OSError, ValueError, KeyError) as e:
        raise PresetLoadError(
            f"{filepath} cannot be read ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); the preset is "
            f"damaged or incomplete.\n{remedy(filepath)}"
        ) from e
    if settings.flag(ALLOW_NON_FINITE_ENV_VAR, default=False):
        return
    # One device-to-host read for all variables, not one per variable.
    checks = [
        ops.all(ops.isfinite(v.value))
        for v in variables
        if "float" in str(v.dtype)
    ]
    if not checks:
        return
    finite = ops.convert_to_numpy(ops.stack(checks))
    floats = [v for v in variables if "float" in str(v.dtype)]
    bad = [v.path for v, ok in zip(floats, finite) if not ok]
    if bad:
        shown = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise PresetLoadError(
            f"{filepath}: NaN or infinite values in {shown}; every output "
            f"would be NaN.\n{remedy(filepath)} (To load it anyway: "
            f"{ALLOW_NON_FINITE_ENV_VAR}=1.)"
        )
