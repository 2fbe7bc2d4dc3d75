from mlpipe.service import run
from mlpipe.settings import load_settings
from mlpipe_deployer.settings import DeployerSettings

run("mlpipe_deployer.main:app", "deployer", load_settings(DeployerSettings))
