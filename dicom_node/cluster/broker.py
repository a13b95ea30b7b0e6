"""The job queue: Celery on RabbitMQ.

One queue, `segment`, of jobs naming a series and its generation. The settings are what makes
hand-off at least once: a worker takes one job at a time (`worker_prefetch_multiplier = 1`)
and acknowledges it only after the outcome is recorded (`task_acks_late`); when the worker
dies, RabbitMQ sees its connection close and hands the unacknowledged job to another worker
at once (`task_reject_on_worker_lost` keeps Celery from acknowledging it on the dead worker's
behalf). A job delivered twice is harmless: the store claims a series once.

Messages are JSON and persistent, on a durable queue: a broker restart keeps them.
"""

from __future__ import annotations

from celery import Celery

from dicom_node.app.config import ClusterConfig

QUEUE = "dicom-node.segment"
SEGMENT_TASK = "dicom_node.segment"


def celery_app(cluster: ClusterConfig) -> Celery:
    app = Celery("dicom_node", broker=cluster.broker, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=QUEUE,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # The worker runs a job in its main thread (the solo pool: the model is in the
        # inference process, `pipeline.worker`), so it cannot answer AMQP heartbeats meanwhile.
        # A worker that dies is seen at once, its TCP connection closing; one that hangs or
        # vanishes with its machine is seen by its lease running out (`cluster.dispatch`).
        broker_heartbeat=0,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_enable_remote_control=False,
        worker_send_task_events=False,
    )
    return app


def publish(app: Celery, series_id: int, generation: int) -> None:
    """Queue the job of segmenting `series_id` at `generation`."""
    app.send_task(SEGMENT_TASK, kwargs={"series_id": series_id, "generation": generation})
