"""A join restoring partitions waits for a previous owner's open transaction (adapters/changelog.py), and says
how long it waited: the rolling restart's slowest requests came with a restore that took 4.1 s (bench/roll.py),
and the log line alone could not tell a wait from a slow read."""
from confluent_kafka import IsolationLevel

from streams.adapters.changelog import ChangelogReader


def _reader(answers):
    reader = ChangelogReader({"bootstrap.servers": "127.0.0.1:9"}, "state", settle_s=5.0)

    def committed_ends(partitions, isolation=IsolationLevel.READ_COMMITTED):
        committed, written = answers[0]
        if isolation == IsolationLevel.READ_UNCOMMITTED:  # the second look-up of a turn: the next turn's answer
            if len(answers) > 1:
                answers.pop(0)
            return written
        return committed
    reader.committed_ends = committed_ends
    return reader


def test_no_open_transaction_no_wait():
    reader = _reader([({0: 5}, {0: 5})])
    try:
        assert reader.settled_ends([0]) == {0: 5} and reader.settled_s == 0.0
    finally:
        reader.close()


def test_an_open_transaction_is_waited_for_and_the_wait_is_kept():
    reader = _reader([({0: 5}, {0: 7}), ({0: 5}, {0: 7}), ({0: 8}, {0: 8})])
    try:
        assert reader.settled_ends([0]) == {0: 8}
        assert 0.15 <= reader.settled_s < 5.0
        assert reader.read([]) == {} and reader.settled_s == 0.0  # each read starts its own count
    finally:
        reader.close()
