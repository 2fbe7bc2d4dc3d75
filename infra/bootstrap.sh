#!/usr/bin/env bash
# Sets up one GCP project for mlpipe, from an empty project to a running pipeline: APIs, the
# Artifact Registry repository, one service account per service (least privilege, each role
# justified below), the bucket, the Cloud Deploy delivery pipelines, the Cloud Build triggers
# and a first build of every service, then `mlpipe infra apply`. Safe to re-run: it skips what
# exists. docs/deploy.md explains each step.
#
#   PROJECT=acme-ml-dev GITHUB_OWNER=acme GITHUB_REPO=mlpipe infra/bootstrap.sh dev
#   PROJECT=acme-ml-staging DELIVERY_PROJECT=acme-ml-dev infra/bootstrap.sh staging
#   PROJECT=acme-ml-prod DELIVERY_PROJECT=acme-ml-dev infra/bootstrap.sh prod
#
# ENV (default dev) names infra/environments/ENV.yaml; use one project per environment.
# REGION defaults to us-central1 and must match that file's region. Without GITHUB_OWNER and
# GITHUB_REPO the triggers and the first build are skipped (connect the repository first).
# Run from a clone of the repository as a project Owner: it grants roles (for staging and prod,
# on the delivery project too).
#
# DEPLOY=release (default): services ship as Cloud Deploy releases through dev → staging →
# prod. Images are built and releases created in one project, the delivery project (dev's:
# DELIVERY_PROJECT, which defaults to PROJECT for ENV=dev), which holds the delivery pipelines,
# the targets and the only triggers. Bootstrap dev first; every environment file
# (infra/environments/{dev,staging,prod}.yaml) must name its project and project_number then,
# because a release renders all three.
# DEPLOY=direct: each project builds and deploys its own services (`gcloud run deploy`), with
# triggers of its own; no Cloud Deploy.
#
# Written without access to a GCP project: the commands were checked for syntax against the
# gcloud CLI, not run against Google Cloud.
set -euo pipefail

ENV="${1:-dev}"
: "${PROJECT:?set PROJECT to the GCP project id}"
REGION="${REGION:-us-central1}"
REPOSITORY="${REPOSITORY:-mlpipe}"
# The same name as infra/environments/*.yaml's bucket ("{project}-mlpipe").
BUCKET="${PROJECT}-mlpipe"
SERVICES=(ingest trainer evaluator deployer predictor notifier console)
DEPLOY="${DEPLOY:-release}"
[[ "$DEPLOY" == release || "$DEPLOY" == direct ]] || {
  echo "DEPLOY must be release or direct, not '$DEPLOY'" >&2
  exit 1
}
if [[ "$DEPLOY" == release ]]; then
  if [[ "$ENV" == dev ]]; then DELIVERY_PROJECT="${DELIVERY_PROJECT:-$PROJECT}"; fi
  : "${DELIVERY_PROJECT:?set DELIVERY_PROJECT to the dev project, which holds the pipelines}"
else
  DELIVERY_PROJECT="$PROJECT"
fi
# This project builds the images (and, with DEPLOY=release, creates the releases).
BUILDS_HERE=false
[[ "$DEPLOY" == direct || "$PROJECT" == "$DELIVERY_PROJECT" ]] && BUILDS_HERE=true

cd "$(dirname "$0")/.."
# Where the deployer rolls models out in this environment (cloud_run or vertex): the roles of
# the deployer and of the serving identity depend on it.
DEPLOY_TARGET="$(sed -n 's/^deploy_target: *\([a-z_]*\).*/\1/p' "infra/environments/$ENV.yaml")"
[[ "$DEPLOY_TARGET" == cloud_run || "$DEPLOY_TARGET" == vertex ]] || {
  echo "infra/environments/$ENV.yaml: deploy_target must be cloud_run or vertex" >&2
  exit 1
}
g() { gcloud --project="$PROJECT" --quiet "$@"; }
step() { printf '\n== %s\n' "$*"; }
sa() { echo "$1@${PROJECT}.iam.gserviceaccount.com"; }
# A new service account takes a few seconds to be visible to IAM: retry bindings.
retry() {
  local n
  for n in 1 2 3 4 5; do
    "$@" >/dev/null && return 0
    echo "  (retrying in $((n * 5))s)"
    sleep $((n * 5))
  done
  "$@" >/dev/null
}

NUMBER="$(gcloud projects describe "$PROJECT" --format='value(projectNumber)')"
BUILD_SA="$(sa mlpipe-build)"
PUBSUB_AGENT="service-${NUMBER}@gcp-sa-pubsub.iam.gserviceaccount.com"
# Cloud Deploy renders and deploys as this account (mlpipe_ops.release.EXECUTION_ACCOUNT),
# keeping sources and outputs in this bucket (release.releases_bucket).
DEPLOY_SA="mlpipe-deploy@${DELIVERY_PROJECT}.iam.gserviceaccount.com"
RELEASES="gs://${PROJECT}-mlpipe-releases"
# Pulls the images of this project's Cloud Run revisions.
RUN_AGENT="service-${NUMBER}@serverless-robot-prod.iam.gserviceaccount.com"

step "APIs"
g services enable \
  run.googleapis.com pubsub.googleapis.com storage.googleapis.com \
  cloudbuild.googleapis.com artifactregistry.googleapis.com cloudscheduler.googleapis.com \
  aiplatform.googleapis.com iam.googleapis.com cloudresourcemanager.googleapis.com \
  bigquery.googleapis.com earthengine.googleapis.com dataflow.googleapis.com \
  cloudtrace.googleapis.com secretmanager.googleapis.com
if [[ "$DEPLOY" == release && "$PROJECT" == "$DELIVERY_PROJECT" ]]; then
  g services enable clouddeploy.googleapis.com
fi
# The Pub/Sub service agent signs push OIDC tokens and forwards dead letters; make sure it
# exists before anything is granted to it.
g beta services identity create --service=pubsub.googleapis.com >/dev/null
# The Cloud Storage service agent publishes the bucket notification (`infra apply` grants it
# roles/pubsub.publisher on gcs-objects); this creates it if the project never used GCS.
gcloud storage service-agent --project="$PROJECT" >/dev/null

step "Artifact Registry repository $REPOSITORY ($REGION)"
g artifacts repositories describe "$REPOSITORY" --location="$REGION" >/dev/null 2>&1 \
  || g artifacts repositories create "$REPOSITORY" --repository-format=docker \
    --location="$REGION" --description="mlpipe service images"

step "Service accounts"
ensure_sa() {
  g iam service-accounts describe "$(sa "$1")" >/dev/null 2>&1 \
    || g iam service-accounts create "$1" --display-name="$2"
}
for s in "${SERVICES[@]}"; do
  ensure_sa "mlpipe-$s" "mlpipe $s (Cloud Run runtime)"
  # Signs the push requests of $s's subscription; `infra apply` lets it invoke only $s.
  ensure_sa "mlpipe-push-$s" "mlpipe push to $s (OIDC)"
done
ensure_sa mlpipe-build "mlpipe Cloud Build"
# The predictor's identity on Vertex AI (DeployedModel.service_account; the environment file's
# serving_service_account).
if [[ "$DEPLOY_TARGET" == vertex ]]; then ensure_sa mlpipe-serving "mlpipe predictor on Vertex AI"; fi
if [[ "$DEPLOY" == release && "$PROJECT" == "$DELIVERY_PROJECT" ]]; then
  ensure_sa mlpipe-deploy "mlpipe Cloud Deploy (render and deploy)"
fi

step "Bucket gs://$BUCKET"
gcloud storage buckets describe "gs://$BUCKET" --project="$PROJECT" >/dev/null 2>&1 \
  || gcloud storage buckets create "gs://$BUCKET" --project="$PROJECT" --location="$REGION" \
    --uniform-bucket-level-access --public-access-prevention
bucket_role() {
  retry gcloud storage buckets add-iam-policy-binding "gs://$BUCKET" --project="$PROJECT" \
    --member="serviceAccount:$1" --role="$2" "${@:3}"
}
# An IAM condition that limits a bucket role to the model registry's objects (registry/...,
# mlpipe.store.layout); conditions need uniform bucket-level access, which the bucket has.
REGISTRY_ONLY="expression=resource.name.startsWith('projects/_/buckets/${BUCKET}/objects/registry/'),title=registry-only,description=mlpipe model registry objects"
MONITORING_ONLY="expression=resource.name.startsWith('projects/_/buckets/${BUCKET}/objects/monitoring/'),title=monitoring-only,description=mlpipe prediction logs"
PREDICTIONS_ONLY="expression=resource.name.startsWith('projects/_/buckets/${BUCKET}/objects/predictions/'),title=predictions-only,description=mlpipe batch predictions and their job records"
DATAFLOW_ONLY="expression=resource.name.startsWith('projects/_/buckets/${BUCKET}/objects/dataflow/'),title=dataflow-only,description=Dataflow templates and staging and temporary files"
# ingest, trainer, evaluator, deployer create objects, read them back, and overwrite or
# delete some (training claims, the champion alias, reports): roles/storage.objectUser is the
# narrowest predefined role with delete, and it is granted on this bucket only.
for s in ingest trainer evaluator deployer; do
  bucket_role "$(sa "mlpipe-$s")" roles/storage.objectUser
done
# The predictor reads models from the registry ...
bucket_role "$(sa mlpipe-predictor)" roles/storage.objectViewer
# ... and keeps a rejected push body under quarantine/ (create only, never overwrite).
bucket_role "$(sa mlpipe-predictor)" roles/storage.objectCreator
# Its automatic promotion of a canary rewrites the registry's alias objects (champion, canary:
# overwrite and delete), so it may delete and replace objects, under registry/ only.
bucket_role "$(sa mlpipe-predictor)" roles/storage.objectUser --condition="$REGISTRY_ONLY"
# Its batch jobs (Dataflow workers running as mlpipe-predictor) delete a retried bundle's
# shards, a failed job's outputs and its records, under predictions/ only ...
bucket_role "$(sa mlpipe-predictor)" roles/storage.objectUser --condition="$PREDICTIONS_ONLY"
# ... and Dataflow stages, writes and removes its temporary files under dataflow/ only.
bucket_role "$(sa mlpipe-predictor)" roles/storage.objectUser --condition="$DATAFLOW_ONLY"
if [[ "$DEPLOY_TARGET" == vertex ]]; then
  # On Vertex AI the predictor runs as mlpipe-serving and loads the served version from the
  # registry: read only, under registry/ only.
  bucket_role "$(sa mlpipe-serving)" roles/storage.objectViewer --condition="$REGISTRY_ONLY"
  # ... and appends its sampled prediction log under monitoring/ (create only).
  bucket_role "$(sa mlpipe-serving)" roles/storage.objectCreator --condition="$MONITORING_ONLY"
fi
QUARANTINE_ONLY="expression=resource.name.startsWith('projects/_/buckets/${BUCKET}/objects/quarantine/'),title=quarantine-only,description=mlpipe quarantined inputs"
# The console reads every page's records ...
bucket_role "$(sa mlpipe-console)" roles/storage.objectViewer
# ... records each action under audit/console/ (create only) ...
bucket_role "$(sa mlpipe-console)" roles/storage.objectCreator
# ... and notes a replay on the quarantined object's metadata (an update, quarantine/ only).
bucket_role "$(sa mlpipe-console)" roles/storage.objectUser --condition="$QUARANTINE_ONLY"
NOTIFICATIONS_ONLY="expression=resource.name.startsWith('projects/_/buckets/${BUCKET}/objects/notifications/'),title=notifications-only,description=mlpipe notices sent to channels"
# The notifier claims, and marks sent, one record per notice and channel under notifications/
# (create, read, compare-and-swap), under notifications/ only ...
bucket_role "$(sa mlpipe-notifier)" roles/storage.objectUser --condition="$NOTIFICATIONS_ONLY"
# ... and keeps a notice a channel refused under quarantine/ (create only). It publishes
# nothing: `infra apply` grants it no topic (it reads pipeline-failures). Its webhooks' signing
# secrets: roles/secretmanager.secretAccessor on each secret (docs/notifications.md).
bucket_role "$(sa mlpipe-notifier)" roles/storage.objectCreator --condition="$QUARANTINE_ONLY"
# Publishing to topics is granted per topic by `mlpipe infra apply` (the topics exist then).

step "Roles of ingest (the BigQuery source)"
# Runs the BigQuery source's query and extract jobs, billed to this project
# (bigquery.jobs.create). The extract writes under ingest/exports/ in the bucket with the
# ingest account's own storage role above. Reading a source table also needs
# roles/bigquery.dataViewer on its dataset, granted by the dataset's owner (public datasets
# need none): docs/ingest-sources.md#bigquery.
retry g projects add-iam-policy-binding "$PROJECT" --condition=None \
  --member="serviceAccount:$(sa mlpipe-ingest)" --role=roles/bigquery.jobUser

step "Roles of ingest (the Earth Engine source)"
# The earth_engine source starts table exports and reads their operations under this project
# (MLPIPE_EARTHENGINE_PROJECT defaults to it): Earth Engine asks for
# roles/serviceusage.serviceUsageConsumer and one of its own roles that may create export
# tasks (roles/earthengine.writer). The project must also be registered for Earth Engine
# (commercial or noncommercial use), once, in the Cloud console's Earth Engine page: no
# command does that. The export writes into the bucket as the caller, through the
# roles/storage.objectUser ingest holds on it.
for role in roles/earthengine.writer roles/serviceusage.serviceUsageConsumer; do
  retry g projects add-iam-policy-binding "$PROJECT" --condition=None \
    --member="serviceAccount:$(sa mlpipe-ingest)" --role="$role"
done

step "Roles of the trainer"
# Creates Vertex AI CustomJobs for pipelines whose training.backend is vertex.
retry g projects add-iam-policy-binding "$PROJECT" --condition=None \
  --member="serviceAccount:$(sa mlpipe-trainer)" --role=roles/aiplatform.user
# A CustomJob runs as mlpipe-trainer (training.vertex.service_account), so the job can read the
# dataset, write the model and publish TrainingCompleted; starting it needs actAs on itself.
retry g iam service-accounts add-iam-policy-binding "$(sa mlpipe-trainer)" \
  --member="serviceAccount:$(sa mlpipe-trainer)" --role=roles/iam.serviceAccountUser

step "Roles of the predictor (batch jobs on Dataflow)"
# Launches the batch job's Flex Template and follows and cancels its jobs (Dataflow grants
# per project).
retry g projects add-iam-policy-binding "$PROJECT" --condition=None \
  --member="serviceAccount:$(sa mlpipe-predictor)" --role=roles/dataflow.developer
# The job's workers run as mlpipe-predictor (they read the inputs and the registry, write the
# outputs and publish BatchPredictionCompleted with its other roles).
retry g projects add-iam-policy-binding "$PROJECT" --condition=None \
  --member="serviceAccount:$(sa mlpipe-predictor)" --role=roles/dataflow.worker
# Launching a job that runs as mlpipe-predictor needs actAs on itself.
retry g iam service-accounts add-iam-policy-binding "$(sa mlpipe-predictor)" \
  --member="serviceAccount:$(sa mlpipe-predictor)" --role=roles/iam.serviceAccountUser
# The launcher and the workers pull the batch job's image from this repository only.
retry g artifacts repositories add-iam-policy-binding "$REPOSITORY" --location="$REGION" \
  --member="serviceAccount:$(sa mlpipe-predictor)" --role=roles/artifactregistry.reader

step "Roles of ingest (large landings validated on Dataflow)"
# Launches the batch job's Flex Template with a validation spec, follows and cancels its jobs.
retry g projects add-iam-policy-binding "$PROJECT" --condition=None \
  --member="serviceAccount:$(sa mlpipe-ingest)" --role=roles/dataflow.developer
# The validation job's workers run as mlpipe-ingest (they read the source buckets ingest may
# read and write the verdict under ingest/exports/ with its other roles).
retry g projects add-iam-policy-binding "$PROJECT" --condition=None \
  --member="serviceAccount:$(sa mlpipe-ingest)" --role=roles/dataflow.worker
# Launching a job that runs as mlpipe-ingest needs actAs on itself.
retry g iam service-accounts add-iam-policy-binding "$(sa mlpipe-ingest)" \
  --member="serviceAccount:$(sa mlpipe-ingest)" --role=roles/iam.serviceAccountUser
# The launcher and the workers pull the batch job's image from this repository only.
retry g artifacts repositories add-iam-policy-binding "$REPOSITORY" --location="$REGION" \
  --member="serviceAccount:$(sa mlpipe-ingest)" --role=roles/artifactregistry.reader

step "Roles of the deployer ($DEPLOY_TARGET)"
if [[ "$DEPLOY_TARGET" == cloud_run ]]; then
  # Makes revisions of mlpipe-predictor that run as mlpipe-predictor: actAs on that account
  # only (roles/run.developer on the service itself is granted by `mlpipe infra apply`).
  retry g iam service-accounts add-iam-policy-binding "$(sa mlpipe-predictor)" \
    --member="serviceAccount:$(sa mlpipe-deployer)" --role=roles/iam.serviceAccountUser
fi
if [[ "$DEPLOY_TARGET" == vertex ]]; then
  # Uploads models and deploys them to the endpoint (Vertex AI grants per project).
  retry g projects add-iam-policy-binding "$PROJECT" --condition=None \
    --member="serviceAccount:$(sa mlpipe-deployer)" --role=roles/aiplatform.user
  # Deploys models that run as mlpipe-serving (DeployedModel.service_account): actAs on it.
  retry g iam service-accounts add-iam-policy-binding "$(sa mlpipe-serving)" \
    --member="serviceAccount:$(sa mlpipe-deployer)" --role=roles/iam.serviceAccountUser
fi

step "Traces"
for s in "${SERVICES[@]}"; do
  # Each service (and the training jobs, which run as mlpipe-trainer) writes its spans to
  # Cloud Trace (infra/runtime.yaml: MLPIPE_TRACE_EXPORTER=cloud-trace; mlpipe.tracing).
  retry g projects add-iam-policy-binding "$PROJECT" --condition=None \
    --member="serviceAccount:$(sa "mlpipe-$s")" --role=roles/cloudtrace.agent
done

step "Push identities"
for s in "${SERVICES[@]}"; do
  # Pub/Sub mints each push request's OIDC token as this account (required explicitly in
  # projects created before 2021-04-08; granted on the account, not the project).
  retry g iam service-accounts add-iam-policy-binding "$(sa "mlpipe-push-$s")" \
    --member="serviceAccount:$PUBSUB_AGENT" --role=roles/iam.serviceAccountTokenCreator
done

if [[ "$BUILDS_HERE" == true ]]; then
  step "Roles of the build ($BUILD_SA)"
  # Writes build logs (cloudbuild/service.yaml: logging CLOUD_LOGGING_ONLY, needed with a
  # user-specified build service account).
  retry g projects add-iam-policy-binding "$PROJECT" --condition=None \
    --member="serviceAccount:$BUILD_SA" --role=roles/logging.logWriter
  # Pushes images to this repository only.
  retry g artifacts repositories add-iam-policy-binding "$REPOSITORY" --location="$REGION" \
    --member="serviceAccount:$BUILD_SA" --role=roles/artifactregistry.writer
fi
if [[ "$DEPLOY" == direct ]]; then
  # Deploys the services. `gcloud run deploy --no-allow-unauthenticated` edits a
  # service's IAM policy (it removes allUsers), which roles/run.developer cannot do.
  retry g projects add-iam-policy-binding "$PROJECT" --condition=None \
    --member="serviceAccount:$BUILD_SA" --role=roles/run.admin
  for s in "${SERVICES[@]}"; do
    # Deploys mlpipe-$s to run as mlpipe-$s (actAs on that account only).
    retry g iam service-accounts add-iam-policy-binding "$(sa "mlpipe-$s")" \
      --member="serviceAccount:$BUILD_SA" --role=roles/iam.serviceAccountUser
  done
fi

if [[ "$DEPLOY" == release && "$PROJECT" == "$DELIVERY_PROJECT" ]]; then
  step "Cloud Deploy: releases bucket $RELEASES, roles of $BUILD_SA and $DEPLOY_SA"
  gcloud storage buckets describe "$RELEASES" --project="$PROJECT" >/dev/null 2>&1 \
    || gcloud storage buckets create "$RELEASES" --project="$PROJECT" --location="$REGION" \
      --uniform-bucket-level-access --public-access-prevention
  # Creates releases of the delivery pipelines (and their first rollout, to dev).
  retry g projects add-iam-policy-binding "$PROJECT" --condition=None \
    --member="serviceAccount:$BUILD_SA" --role=roles/clouddeploy.releaser
  # A release renders and deploys as the execution account: its creator needs actAs on it.
  retry g iam service-accounts add-iam-policy-binding "$DEPLOY_SA" \
    --member="serviceAccount:$BUILD_SA" --role=roles/iam.serviceAccountUser
  # gcloud deploy releases create stages the source here. First it reads the bucket's metadata
  # (it checks that the bucket exists) ...
  retry gcloud storage buckets add-iam-policy-binding "$RELEASES" --project="$PROJECT" \
    --member="serviceAccount:$BUILD_SA" --role=roles/storage.legacyBucketReader
  # ... then it uploads the source archive: create objects, in this bucket only.
  retry gcloud storage buckets add-iam-policy-binding "$RELEASES" --project="$PROJECT" \
    --member="serviceAccount:$BUILD_SA" --role=roles/storage.objectCreator
  # The execution account runs Cloud Deploy's render and deploy jobs (required of it).
  retry g projects add-iam-policy-binding "$PROJECT" --condition=None \
    --member="serviceAccount:$DEPLOY_SA" --role=roles/clouddeploy.jobRunner
  # It reads each release's source and writes the rendered manifests and job outputs
  # (the targets' artifactStorage), in this bucket only.
  retry gcloud storage buckets add-iam-policy-binding "$RELEASES" --project="$PROJECT" \
    --member="serviceAccount:$DEPLOY_SA" --role=roles/storage.objectUser
fi

if [[ "$DEPLOY" == release ]]; then
  step "Cloud Deploy into $PROJECT: roles of $DEPLOY_SA"
  # Replaces the Cloud Run services of this project (the manifests never touch IAM, so
  # roles/run.developer suffices: the push identities' run.invoker stays as infra apply set it).
  retry g projects add-iam-policy-binding "$PROJECT" --condition=None \
    --member="serviceAccount:$DEPLOY_SA" --role=roles/run.developer
  for s in "${SERVICES[@]}"; do
    # Deploys mlpipe-$s to run as mlpipe-$s (actAs on that account only).
    retry g iam service-accounts add-iam-policy-binding "$(sa "mlpipe-$s")" \
      --member="serviceAccount:$DEPLOY_SA" --role=roles/iam.serviceAccountUser
  done
  if [[ "$PROJECT" != "$DELIVERY_PROJECT" ]]; then
    # This project's revisions run the images built in the delivery project: Cloud Run's
    # service agent pulls them from that repository only.
    retry gcloud artifacts repositories add-iam-policy-binding "$REPOSITORY" \
      --project="$DELIVERY_PROJECT" --location="$REGION" \
      --member="serviceAccount:$RUN_AGENT" --role=roles/artifactregistry.reader
  fi
fi

if [[ "$DEPLOY" == release && "$PROJECT" == "$DELIVERY_PROJECT" ]]; then
  step "Cloud Deploy delivery pipelines mlpipe-<service> and targets ($REGION)"
  pipeline="$(mktemp -d)"
  # Projects and numbers of staging and prod come from their environment files.
  uv run --frozen mlpipe infra release-config --out "$pipeline" \
    --code-version "$(git rev-parse HEAD)" --project "$ENV=$PROJECT" --project-number "$ENV=$NUMBER"
  g deploy apply --file="$pipeline/clouddeploy.yaml" --region="$REGION"
  rm -rf "$pipeline"
fi

if [[ "$BUILDS_HERE" != true ]]; then
  step "Cloud Build triggers: none here (the delivery project $DELIVERY_PROJECT builds)"
  echo "Releases reach $ENV by promotion (docs/deploy.md). Until the first one does, \`infra"
  echo "apply\` reports the services' run.invoker bindings as blocked."
elif [[ -z "${GITHUB_OWNER:-}" || -z "${GITHUB_REPO:-}" ]]; then
  step "Cloud Build triggers: skipped (set GITHUB_OWNER and GITHUB_REPO)"
  echo "Connect the repository to Cloud Build first (docs/deploy.md, step 2). Until the"
  echo "services are deployed, \`infra apply\` reports their run.invoker bindings as blocked."
else
  step "Cloud Build triggers ($GITHUB_OWNER/$GITHUB_REPO) and a first build"
  triggers="$(mktemp -d)"
  trap 'rm -rf "$triggers"' EXIT
  builds=()
  for s in "${SERVICES[@]}"; do
    # The committed trigger, for this repository, running as the build account, with this
    # environment's substitutions added to its own (_SERVICE), which it lists last.
    sed -e "s|^  owner: .*|  owner: ${GITHUB_OWNER}|" -e "s|^  name: .*|  name: ${GITHUB_REPO}|" \
      "cloudbuild/triggers/$s.yaml" >"$triggers/$s.yaml"
    cat >>"$triggers/$s.yaml" <<EOF
  _DEPLOY: ${DEPLOY}
  _ENV: ${ENV}
  _REGION: ${REGION}
  _REPOSITORY: ${REPOSITORY}
serviceAccount: projects/${PROJECT}/serviceAccounts/${BUILD_SA}
EOF
    g builds triggers import --source="$triggers/$s.yaml" >/dev/null
    builds+=("$(g builds triggers run "mlpipe-$s" --branch=main --format='value(metadata.build.id)')")
  done
  # The batch job's image and its Flex Template spec, written to this environment's bucket
  # (jobs/batch/cloudbuild.yaml). BATCH_LAUNCHER_IMAGE names Dataflow's Python template
  # launcher release to build with: pin a tag or a digest.
  sed -e "s|^  owner: .*|  owner: ${GITHUB_OWNER}|" -e "s|^  name: .*|  name: ${GITHUB_REPO}|" \
    -e "s|^substitutions: {}$|substitutions:|" cloudbuild/triggers/batch.yaml >"$triggers/batch.yaml"
  cat >>"$triggers/batch.yaml" <<EOF
  _BUCKET: ${BUCKET}
  _LAUNCHER_IMAGE: ${BATCH_LAUNCHER_IMAGE:-gcr.io/dataflow-templates-base/python311-template-launcher-base:latest}
  _REGION: ${REGION}
  _REPOSITORY: ${REPOSITORY}
serviceAccount: projects/${PROJECT}/serviceAccounts/${BUILD_SA}
EOF
  g builds triggers import --source="$triggers/batch.yaml" >/dev/null
  builds+=("$(g builds triggers run mlpipe-batch --branch=main --format='value(metadata.build.id)')")
  for id in "${builds[@]}"; do
    while status="$(g builds describe "$id" --format='value(status)')" \
      && [[ "$status" == QUEUED || "$status" == PENDING || "$status" == WORKING ]]; do
      sleep 15
    done
    echo "  build $id: $status"
    [[ "$status" == SUCCESS ]] || { echo "see: gcloud builds log $id --project=$PROJECT"; exit 1; }
  done
  if [[ "$DEPLOY" == release ]]; then
    # Each build created a release whose first rollout deploys to dev: wait for those.
    for i in "${!SERVICES[@]}"; do
      s="${SERVICES[$i]}"
      sha="$(g builds describe "${builds[$i]}" --format='value(substitutions.SHORT_SHA)')"
      while state="$(g deploy rollouts list --release="rel-$sha-$s" \
        --delivery-pipeline="mlpipe-$s" --region="$REGION" --limit=1 --format='value(state)')" \
        && [[ -z "$state" || "$state" == PENDING* || "$state" == IN_PROGRESS ]]; do
        sleep 15
      done
      echo "  rollout of rel-$sha-$s to $ENV: $state"
      [[ "$state" == SUCCEEDED ]] || {
        echo "see: gcloud deploy releases describe rel-$sha-$s --delivery-pipeline=mlpipe-$s \
--region=$REGION --project=$PROJECT"
        exit 1
      }
    done
  fi
fi

step "Topology: mlpipe infra apply --env $ENV"
uv run --frozen mlpipe infra apply --env "$ENV" --project "$PROJECT" --project-number "$NUMBER"
