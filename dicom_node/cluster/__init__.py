"""Several machines: reception nodes and inference workers on one established engine.

With `[cluster] enabled = true` (`dicom_node.app.config.cluster`) the processes of the node run
apart, each on whichever machine suits it:

- `dicom-node serve --role receive`: reception, completion and selection, delivery and
  retention, as the one-machine node does them; a series it queues goes to the broker as a job
  (`dispatch`), and a delivery it sends is held under a lease (`lease`) that another reception
  node takes over should it die mid-send. Its spool is its own folder under the shared
  directory (`storage`).
- `dicom-node serve --role worker`: a Celery worker (`worker`) that takes one job at a time,
  claims the series through the store (the claim is the only way into `segmenting`, so a job
  the broker delivers twice is run once), renews its lease while the inference worker runs,
  and records the outcome as the one-machine node does.

The broker is RabbitMQ (`broker`): a job is acknowledged only once its series is recorded
(`task_acks_late`), so a worker that dies mid-inference has its job handed to another at once.
The state stays in PostgreSQL; files are on a shared filesystem path.
"""
