from mlpipe.service import run
from mlpipe.settings import CommonSettings, load_settings

run("mlpipe_deployer.main:app", "deployer", load_settings(CommonSettings))
