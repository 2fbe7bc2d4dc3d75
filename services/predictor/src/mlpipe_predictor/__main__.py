from mlpipe.service import run
from mlpipe.settings import load_settings
from mlpipe_predictor.settings import PredictorSettings

run("mlpipe_predictor.main:app", "predictor", load_settings(PredictorSettings))
