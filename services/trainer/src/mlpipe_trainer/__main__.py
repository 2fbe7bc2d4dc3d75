from mlpipe.service import run
from mlpipe.settings import load_settings
from mlpipe_trainer.main import TrainerSettings

run("mlpipe_trainer.main:app", "trainer", load_settings(TrainerSettings))
