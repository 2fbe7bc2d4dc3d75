"""The three steps as a Metaflow flow: start (load) → train → end (evaluate).

    METAFLOW_DEFAULT_DATASTORE=local METAFLOW_DEFAULT_METADATA=local \
    METAFLOW_DATASTORE_SYSROOT_LOCAL=/tmp/... python iris_metaflow.py run --csv PATH

Run by peers.py in bench/.venvs/metaflow; each step is its own process, as Metaflow's local
runtime does it, and artifacts (the frame, the model) go through the local datastore.
"""

from metaflow import FlowSpec, Parameter, step


class IrisFlow(FlowSpec):
    csv = Parameter("csv", help="the iris CSV")

    @step
    def start(self):
        from iris_bare import load

        self.frame = load(self.csv)
        self.next(self.train)

    @step
    def train(self):
        from iris_bare import train

        self.model = train(self.frame)
        self.next(self.end)

    @step
    def end(self):
        from iris_bare import evaluate

        self.accuracy = evaluate(self.frame, self.model)
        print(f"accuracy {self.accuracy:.4f}")


if __name__ == "__main__":
    IrisFlow()
