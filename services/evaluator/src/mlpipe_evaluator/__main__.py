from mlpipe.service import run
from mlpipe.settings import CommonSettings

run("mlpipe_evaluator.main:app", "evaluator", CommonSettings)
