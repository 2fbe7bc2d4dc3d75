from mlpipe.service import run
from mlpipe.settings import CommonSettings, load_settings

run("mlpipe_predictor.main:app", "predictor", load_settings(CommonSettings))
