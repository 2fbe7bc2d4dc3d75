from mlpipe.runtime.service import run
from mlpipe_predictor.settings import PredictorSettings

run("mlpipe_predictor.main:app", "predictor", PredictorSettings)
