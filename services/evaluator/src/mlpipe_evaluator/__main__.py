from mlpipe.runtime.service import run
from mlpipe.runtime.settings import CommonSettings

run("mlpipe_evaluator.main:app", "evaluator", CommonSettings)
