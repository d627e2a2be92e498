# Declarations of the session's events (see _events.pyx), cimported by _session.pyx so it builds
# them with direct field stores: no argument tuple, no __init__ call.

cdef class EventBase:
    cdef object _0, _1, _2, _3, _4, _5     # the fields, in order (six at most)
    cdef tuple _values(self)

cdef class DeviceIdentified(EventBase):
    pass

cdef class Authenticated(EventBase):
    pass

cdef class AuthFailed(EventBase):
    pass

cdef class NonceIssued(EventBase):
    pass

cdef class ServerNonceReceived(EventBase):
    pass

cdef class StatusReceived(EventBase):
    pass

cdef class ResultsReceived(EventBase):
    pass

cdef class UserAlertAnswered(EventBase):
    pass

cdef class GenericAlert(EventBase):
    pass

cdef class ClientEvent(EventBase):
    pass

cdef class LargeObjectFailed(EventBase):
    pass

cdef class CommandNotDelivered(EventBase):
    pass

cdef class SessionEnded(EventBase):
    pass

cdef inline DeviceIdentified new_DeviceIdentified(object dev_id, object devinfo, object session_id, object alert):
    cdef DeviceIdentified e = DeviceIdentified.__new__(DeviceIdentified)
    e._0 = dev_id
    e._1 = devinfo
    e._2 = session_id
    e._3 = alert
    return e


cdef inline Authenticated new_Authenticated(object username, object scheme):
    cdef Authenticated e = Authenticated.__new__(Authenticated)
    e._0 = username
    e._1 = scheme
    return e


cdef inline AuthFailed new_AuthFailed(object username, object scheme, object status, object reason, object side):
    cdef AuthFailed e = AuthFailed.__new__(AuthFailed)
    e._0 = username
    e._1 = scheme
    e._2 = status
    e._3 = reason
    e._4 = side
    return e


cdef inline NonceIssued new_NonceIssued(object dev_id, object nonce):
    cdef NonceIssued e = NonceIssued.__new__(NonceIssued)
    e._0 = dev_id
    e._1 = nonce
    return e


cdef inline ServerNonceReceived new_ServerNonceReceived(object dev_id, object nonce):
    cdef ServerNonceReceived e = ServerNonceReceived.__new__(ServerNonceReceived)
    e._0 = dev_id
    e._1 = nonce
    return e


cdef inline StatusReceived new_StatusReceived(object handle, object cmd, object status, object items, object target, object index):
    cdef StatusReceived e = StatusReceived.__new__(StatusReceived)
    e._0 = handle
    e._1 = cmd
    e._2 = status
    e._3 = items
    e._4 = target
    e._5 = index
    return e


cdef inline ResultsReceived new_ResultsReceived(object handle, object items):
    cdef ResultsReceived e = ResultsReceived.__new__(ResultsReceived)
    e._0 = handle
    e._1 = items
    return e


cdef inline UserAlertAnswered new_UserAlertAnswered(object handle, object status, object answers, object alert):
    cdef UserAlertAnswered e = UserAlertAnswered.__new__(UserAlertAnswered)
    e._0 = handle
    e._1 = status
    e._2 = answers
    e._3 = alert
    return e


cdef inline GenericAlert new_GenericAlert(object correlator, object source, object type, object format, object mark, object data):
    cdef GenericAlert e = GenericAlert.__new__(GenericAlert)
    e._0 = correlator
    e._1 = source
    e._2 = type
    e._3 = format
    e._4 = mark
    e._5 = data
    return e


cdef inline ClientEvent new_ClientEvent(object source, object type, object format, object data):
    cdef ClientEvent e = ClientEvent.__new__(ClientEvent)
    e._0 = source
    e._1 = type
    e._2 = format
    e._3 = data
    return e


cdef inline LargeObjectFailed new_LargeObjectFailed(object handle, object uri, object status, object reason):
    cdef LargeObjectFailed e = LargeObjectFailed.__new__(LargeObjectFailed)
    e._0 = handle
    e._1 = uri
    e._2 = status
    e._3 = reason
    return e


cdef inline CommandNotDelivered new_CommandNotDelivered(object handle, object reason):
    cdef CommandNotDelivered e = CommandNotDelivered.__new__(CommandNotDelivered)
    e._0 = handle
    e._1 = reason
    return e


cdef inline SessionEnded new_SessionEnded(object reason, object detail):
    cdef SessionEnded e = SessionEnded.__new__(SessionEnded)
    e._0 = reason
    e._1 = detail
    return e


