# cython: language_level=3
"""The device port's per-message counters, compiled (L3): the base of
``dmengine.metrics.DeviceMetrics``.

The device port calls five of these per DM message (message in, message out, session start
and end, request latency).  As Python methods bumping dicts they cost 1.1–1.8 µs per message,
5–9 % of a ~20 µs message; here each is one method call into C on fixed fields and arrays
(the encoding is ``xml`` or ``wbxml``, the histograms' buckets are C arrays), about a quarter
of that.  Only the session end's reason stays a dict (reasons are a small open set).
``DeviceMetrics`` (dmengine/metrics.py) reads the fields when the registry is scraped.
"""
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

#: request latency buckets, seconds (metrics.LATENCY_BUCKETS, the same numbers)
LATENCY_BOUNDS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                  1.0, 2.5, 5.0, 10.0)
#: whole-session buckets, seconds (metrics.SESSION_BUCKETS)
SESSION_BOUNDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)

DEF NLAT = 15
DEF NSES = 13


cdef inline double _monotonic() noexcept nogil:
    """time.monotonic() (the same clock: CLOCK_MONOTONIC), without a Python call."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef inline int _enc(str encoding):
    return 1 if encoding == "wbxml" else 0


cdef inline int _bucket(const double* bounds, int n, double v) noexcept nogil:
    """Index of the first bound >= v (Prometheus ``le``); n for +Inf."""
    cdef int i = 0
    while i < n and v > bounds[i]:
        i += 1
    return i


cdef class DeviceCounters:
    """Plain C counters of the device port (see the module docstring)."""
    cdef long long _msg_in[2]
    cdef long long _msg_out[2]
    cdef long long _bytes_in[2]
    cdef long long _bytes_out[2]
    cdef public long long started, in_flight, connections
    cdef public dict ended
    cdef double _lat_bounds[NLAT]
    cdef long long _lat[NLAT + 1]
    cdef public double latency_sum
    cdef double _ses_bounds[NSES]
    cdef long long _ses[NSES + 1]
    cdef public double session_sum

    def __cinit__(self, *args, **kw):
        cdef int i
        for i in range(NLAT):
            self._lat_bounds[i] = LATENCY_BOUNDS[i]
        for i in range(NSES):
            self._ses_bounds[i] = SESSION_BOUNDS[i]
        self.ended = {}

    # --- the hot path ----------------------------------------------------------------------

    def message_in(self, str encoding, Py_ssize_t nbytes):
        cdef int e = _enc(encoding)
        self._msg_in[e] += 1
        self._bytes_in[e] += nbytes

    def message_out(self, str encoding, Py_ssize_t nbytes):
        cdef int e = _enc(encoding)
        self._msg_out[e] += 1
        self._bytes_out[e] += nbytes

    def session_started(self):
        """Counts a new session; returns its start (monotonic), which the session table keeps
        for :meth:`session_ended`."""
        self.started += 1
        self.in_flight += 1
        return _monotonic()

    def session_ended(self, str reason, double started=0.0):
        """``started``: what :meth:`session_started` returned (0: unknown, not timed)."""
        cdef double d
        cdef dict ended = self.ended
        n = ended.get(reason)
        ended[reason] = 1 if n is None else n + 1
        self.in_flight -= 1
        if started > 0.0:
            d = _monotonic() - started
            if d < 0.0:
                d = 0.0
            self._ses[_bucket(self._ses_bounds, NSES, d)] += 1
            self.session_sum += d

    def observe_latency(self, double seconds):
        self._lat[_bucket(self._lat_bounds, NLAT, seconds)] += 1
        self.latency_sum += seconds

    def connection_opened(self):
        self.connections += 1

    def connection_closed(self):
        self.connections -= 1

    # --- read at scrape time -----------------------------------------------------------------

    def counts(self):
        """{"msg_in"|"msg_out"|"bytes_in"|"bytes_out": {encoding: n}}."""
        return {"msg_in": {"xml": self._msg_in[0], "wbxml": self._msg_in[1]},
                "msg_out": {"xml": self._msg_out[0], "wbxml": self._msg_out[1]},
                "bytes_in": {"xml": self._bytes_in[0], "wbxml": self._bytes_in[1]},
                "bytes_out": {"xml": self._bytes_out[0], "wbxml": self._bytes_out[1]}}

    @property
    def buckets(self):
        """Request-latency bucket counts (not cumulative; the last is +Inf)."""
        return [self._lat[i] for i in range(NLAT + 1)]

    @property
    def session_buckets(self):
        return [self._ses[i] for i in range(NSES + 1)]
