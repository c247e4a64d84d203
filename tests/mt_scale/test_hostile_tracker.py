"""A full disk under the TensorBoard tracker: the writer thread's failure is kept for the training
loop's one error line; Python prints no traceback from the thread."""

from __future__ import annotations

import errno
import queue
import threading

from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

from mt_scale.report import quiet_writer_thread_errors


class _FullDisk:
    def write(self, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_the_writer_threads_failure_prints_no_traceback(capsys, monkeypatch) -> None:
    reported: list[BaseException] = []  # what reaches the hook that prints tracebacks
    monkeypatch.setattr(threading, "excepthook", lambda args: reported.append(args.exc_value))
    quiet_writer_thread_errors()
    quiet_writer_thread_errors()  # installed once, however often trackers are built
    pending: queue.Queue = queue.Queue()
    pending.put(b"event")
    thread = _AsyncWriterThread(pending, _FullDisk(), flush_secs=120)
    thread.start()
    thread.join(timeout=60)
    assert isinstance(thread.exception, OSError) and thread.exception.errno == errno.ENOSPC
    assert capsys.readouterr().err == "" and reported == []

    def other() -> None:
        raise ValueError("another thread's error still shows")

    worker = threading.Thread(target=other)
    worker.start()
    worker.join()
    assert [str(error) for error in reported] == ["another thread's error still shows"]
