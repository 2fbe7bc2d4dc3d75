from mlpipe.service import run
from mlpipe.settings import load_settings
from mlpipe_ingest.main import IngestSettings

run("mlpipe_ingest.main:app", "ingest", load_settings(IngestSettings))
