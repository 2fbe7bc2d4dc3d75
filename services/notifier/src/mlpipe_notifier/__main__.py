from mlpipe.runtime.service import run
from mlpipe_notifier.settings import NotifierSettings

run("mlpipe_notifier.main:app", "notifier", NotifierSettings)
