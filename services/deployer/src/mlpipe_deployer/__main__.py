from mlpipe.runtime.service import run
from mlpipe_deployer.settings import DeployerSettings

run("mlpipe_deployer.main:app", "deployer", DeployerSettings)
