"""The target a deployer's settings choose.

Each cloud target's client library is imported only when that target is chosen: the Vertex AI
client alone takes about 5 s of CPU to import, which a local deployer would pay at every start.
"""

from __future__ import annotations

from mlpipe_deployer.settings import DeployerSettings
from mlpipe_deployer.targets import DeployTarget, LocalTarget


def make_target(settings: DeployerSettings) -> DeployTarget:
    if settings.deploy_target == "cloud_run":
        from mlpipe_deployer.targets.cloud_run import CloudRunTarget

        return CloudRunTarget(
            settings.project,
            settings.region,
            settings.cloud_run_service,
            settings.predictor_image,
            settings.code_version,
            env=settings.env,
        )
    if settings.deploy_target == "vertex":
        from mlpipe_deployer.targets.vertex import VertexTarget

        return VertexTarget(
            settings.project,
            settings.region,
            settings.vertex_endpoint,
            settings.predictor_image,
            settings.bucket,
            settings.code_version,
            settings.vertex_machine_type,
            settings.vertex_min_replicas,
            settings.vertex_max_replicas,
            settings.vertex_serving_account,
            settings.vertex_api_endpoint,
            settings.vertex_api_transport,
            env=settings.env,
        )
    return LocalTarget()
