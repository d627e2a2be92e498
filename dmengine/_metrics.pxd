# cython: language_level=3
"""The device port's per-message counters (dmengine/_metrics.pyx), for ``cimport``: the
device port's compiled modules (_dmcore.pyx, _devport.pyx) count a message with C calls to
the ``cdef`` methods below instead of Python method calls (each of those was a method look-up
through DeviceMetrics' MRO, a vectorcall and boxed arguments: ~150-300 instructions)."""
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

cdef enum:
    NLAT = 15           # request-latency bounds (_metrics.LATENCY_BOUNDS)
    NSES = 13           # whole-session bounds (_metrics.SESSION_BOUNDS)


cdef inline double monotonic() noexcept nogil:
    """time.monotonic() (the same clock: CLOCK_MONOTONIC) without a Python call, and at full
    resolution (the event loop's time() is libuv's millisecond clock: too coarse for the
    sub-millisecond buckets of the request-latency histogram)."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef class DeviceCounters:
    cdef long long _msg_in[2]
    cdef long long _msg_out[2]
    cdef long long _bytes_in[2]
    cdef long long _bytes_out[2]
    cdef public long long started, in_flight, connections
    # session ends by reason: the ``ended`` property.  The run of ends with one reason
    # (nearly all of them are "completed") is counted in C, folded into the dict when the
    # reason changes or the dict is read: no dict look-up and store per session
    cdef dict _ended
    cdef str _reason
    cdef long long _reason_n
    cdef double _lat_bounds[NLAT]
    cdef long long _lat[NLAT + 1]
    cdef public double latency_sum
    cdef double _ses_bounds[NSES]
    cdef long long _ses[NSES + 1]
    cdef public double session_sum

    # the hot path, for the compiled device port (the Python methods of the same meaning
    # call these)
    cdef void count_in(self, str encoding, Py_ssize_t nbytes) noexcept
    cdef void count_out(self, str encoding, Py_ssize_t nbytes) noexcept
    cdef double begin_session(self) noexcept
    cdef int end_session(self, str reason, double started) except -1
    cdef void time_request(self, double seconds) noexcept
    cdef int _fold_reason(self) except -1
