"""Local stand-ins of cloud APIs that cannot be reached from here.

Each one answers the real client library over REST as the service's reference says, with every
rule written beside its source (docs/vertex-standin.md), and runs our real images where the
service would run them. Local "Google Cloud" is the emulators: Pub/Sub and GCS.
"""
