"""The seed end to end, the dead letters and a SIGKILL on Testcontainers Kafka (issue 12).

The same tests as in test_pipeline.py, test_errors.py and test_faults.py, on another broker: the
local image ``imagefork/kafka:<version>`` (``make images``) run by testcontainers-python on the host's
network (loopback only), with the local stack's S3Proxy. When Docker answers, their originals do not
run a second time on the local stack (tests/conftest.py); when it does not, these skip, saying why,
and the originals run there.
"""
import pytest

from tests.conftest import drop_schema_resolver

from tests.integration.test_errors import (  # noqa: F401 (collected here, on this module's broker)
    test_undecodable_messages_on_every_topic_are_dead_lettered_with_their_origin,
)
from tests.integration.test_faults import test_sigkill_one_of_two_resize_workers_mid_run  # noqa: F401
from tests.integration.test_pipeline import (  # noqa: F401
    test_malformed_messages_go_to_the_dead_letter_topic_and_nothing_stops,
    test_seed_request_gives_nine_objects_and_one_final_event,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack_env(kafka_container, stack_env):
    """The session's environment (the local stack's S3Proxy) with Kafka on the container."""
    yield {**stack_env, "KAFKA_BOOTSTRAP_SERVERS": kafka_container.bootstrap}
    drop_schema_resolver()  # the container goes when the module ends


def test_the_broker_is_the_container(stack_env, kafka_container):
    """The workers of this module talk to the container: its image, its address, and it is running."""
    from streams.stack.images import KAFKA_IMAGE
    assert kafka_container.image == KAFKA_IMAGE
    assert stack_env["KAFKA_BOOTSTRAP_SERVERS"] == kafka_container.bootstrap
    kafka_container.container.reload()
    assert kafka_container.container.status == "running"
    assert "Kafka Server started" in kafka_container.logs()
