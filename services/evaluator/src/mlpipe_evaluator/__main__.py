from mlpipe.runtime.service import run
from mlpipe_evaluator.settings import EvaluatorSettings

run("mlpipe_evaluator.main:app", "evaluator", EvaluatorSettings)
