#!/usr/bin/env bash
# Sets up one GCP project for mlpipe, from an empty project to a running pipeline: APIs, the
# Artifact Registry repository, one service account per service (least privilege, each role
# justified below), the bucket, the Cloud Build triggers and a first build of every service,
# then `mlpipe infra apply`. Safe to re-run: it skips what exists. docs/deploy.md explains
# each step.
#
#   PROJECT=acme-ml-dev GITHUB_OWNER=acme GITHUB_REPO=mlpipe infra/bootstrap.sh [ENV]
#
# ENV (default dev) names infra/environments/ENV.yaml; use one project per environment.
# REGION defaults to us-central1 and must match that file's region. Without GITHUB_OWNER and
# GITHUB_REPO the triggers and the first build are skipped (connect the repository first).
# Run from a clone of the repository as a project Owner: it grants roles.
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
SERVICES=(ingest trainer evaluator deployer predictor)

cd "$(dirname "$0")/.."
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

step "APIs"
g services enable \
  run.googleapis.com pubsub.googleapis.com storage.googleapis.com \
  cloudbuild.googleapis.com artifactregistry.googleapis.com cloudscheduler.googleapis.com \
  aiplatform.googleapis.com iam.googleapis.com cloudresourcemanager.googleapis.com
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

step "Bucket gs://$BUCKET"
gcloud storage buckets describe "gs://$BUCKET" --project="$PROJECT" >/dev/null 2>&1 \
  || gcloud storage buckets create "gs://$BUCKET" --project="$PROJECT" --location="$REGION" \
    --uniform-bucket-level-access --public-access-prevention
bucket_role() {
  retry gcloud storage buckets add-iam-policy-binding "gs://$BUCKET" --project="$PROJECT" \
    --member="serviceAccount:$1" --role="$2"
}
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
# Publishing to topics is granted per topic by `mlpipe infra apply` (the topics exist then).

step "Roles of the trainer"
# Creates Vertex AI CustomJobs for pipelines whose training.backend is vertex.
retry g projects add-iam-policy-binding "$PROJECT" --condition=None \
  --member="serviceAccount:$(sa mlpipe-trainer)" --role=roles/aiplatform.user
# A CustomJob runs as mlpipe-trainer (training.vertex.service_account), so the job can read the
# dataset, write the model and publish TrainingCompleted; starting it needs actAs on itself.
retry g iam service-accounts add-iam-policy-binding "$(sa mlpipe-trainer)" \
  --member="serviceAccount:$(sa mlpipe-trainer)" --role=roles/iam.serviceAccountUser

step "Push identities"
for s in "${SERVICES[@]}"; do
  # Pub/Sub mints each push request's OIDC token as this account (required explicitly in
  # projects created before 2021-04-08; granted on the account, not the project).
  retry g iam service-accounts add-iam-policy-binding "$(sa "mlpipe-push-$s")" \
    --member="serviceAccount:$PUBSUB_AGENT" --role=roles/iam.serviceAccountTokenCreator
done

step "Roles of the build ($BUILD_SA)"
# Deploys the five services. `gcloud run deploy --no-allow-unauthenticated` edits a service's
# IAM policy (it removes allUsers), which roles/run.developer cannot do.
retry g projects add-iam-policy-binding "$PROJECT" --condition=None \
  --member="serviceAccount:$BUILD_SA" --role=roles/run.admin
# Writes build logs (cloudbuild/service.yaml: logging CLOUD_LOGGING_ONLY, needed with a
# user-specified build service account).
retry g projects add-iam-policy-binding "$PROJECT" --condition=None \
  --member="serviceAccount:$BUILD_SA" --role=roles/logging.logWriter
# Pushes images to this repository only.
retry g artifacts repositories add-iam-policy-binding "$REPOSITORY" --location="$REGION" \
  --member="serviceAccount:$BUILD_SA" --role=roles/artifactregistry.writer
for s in "${SERVICES[@]}"; do
  # Deploys mlpipe-$s to run as mlpipe-$s (actAs on that account only).
  retry g iam service-accounts add-iam-policy-binding "$(sa "mlpipe-$s")" \
    --member="serviceAccount:$BUILD_SA" --role=roles/iam.serviceAccountUser
done

if [[ -z "${GITHUB_OWNER:-}" || -z "${GITHUB_REPO:-}" ]]; then
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
  _ENV: ${ENV}
  _REGION: ${REGION}
  _REPOSITORY: ${REPOSITORY}
serviceAccount: projects/${PROJECT}/serviceAccounts/${BUILD_SA}
EOF
    g builds triggers import --source="$triggers/$s.yaml" >/dev/null
    builds+=("$(g builds triggers run "mlpipe-$s" --branch=main --format='value(metadata.build.id)')")
  done
  for id in "${builds[@]}"; do
    while status="$(g builds describe "$id" --format='value(status)')" \
      && [[ "$status" == QUEUED || "$status" == PENDING || "$status" == WORKING ]]; do
      sleep 15
    done
    echo "  build $id: $status"
    [[ "$status" == SUCCESS ]] || { echo "see: gcloud builds log $id --project=$PROJECT"; exit 1; }
  done
fi

step "Topology: mlpipe infra apply --env $ENV"
uv run --frozen mlpipe infra apply --env "$ENV" --project "$PROJECT" --project-number "$NUMBER"
