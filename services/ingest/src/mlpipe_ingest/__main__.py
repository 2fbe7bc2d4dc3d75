from mlpipe.runtime.service import run
from mlpipe_ingest.settings import IngestSettings

run("mlpipe_ingest.main:app", "ingest", IngestSettings)
