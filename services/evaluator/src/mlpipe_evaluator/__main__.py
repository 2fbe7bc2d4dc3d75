from mlpipe.service import run
from mlpipe.settings import CommonSettings, load_settings

run("mlpipe_evaluator.main:app", "evaluator", load_settings(CommonSettings))
