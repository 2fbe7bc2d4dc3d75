from mlpipe.runtime.service import exit_on_bad_settings, run
from mlpipe.runtime.settings import SettingsError, load_settings
from mlpipe_console.identity import verifier_for
from mlpipe_console.settings import ConsoleSettings

try:
    # A console that would let anyone act away from the emulators must not start at all.
    verifier_for(load_settings(ConsoleSettings))
except SettingsError as exc:
    exit_on_bad_settings("console", exc)
run("mlpipe_console.main:app", "console", ConsoleSettings)
