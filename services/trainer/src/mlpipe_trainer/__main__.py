from mlpipe.runtime.service import run
from mlpipe_trainer.settings import TrainerSettings

run("mlpipe_trainer.main:app", "trainer", TrainerSettings)
