package nbdserver

// The NBD protocol's numbers (doc/proto.md of the NBD project).

const (
	magicNBD       = 0x4e42444d41474943 // "NBDMAGIC"
	magicOpt       = 0x49484156454F5054 // "IHAVEOPT"
	magicOptReply  = 0x3e889045565a9
	magicRequest   = 0x25609513
	magicSimple    = 0x67446698
	magicStructure = 0x668e33ef

	// handshake flags (server) and client flags
	flagFixedNewstyle = 1 << 0
	flagNoZeroes      = 1 << 1

	// options
	optExportName      = 1
	optAbort           = 2
	optList            = 3
	optStartTLS        = 5
	optInfo            = 6
	optGo              = 7
	optStructuredReply = 8
	optListMetaContext = 9
	optSetMetaContext  = 10

	// option replies
	repAck           = 1
	repServer        = 2
	repInfo          = 3
	repMetaContext   = 4
	repFlagError     = 1 << 31
	repErrUnsup      = repFlagError | 1
	repErrPolicy     = repFlagError | 2
	repErrInvalid    = repFlagError | 3
	repErrTLSReqd    = repFlagError | 5
	repErrUnknown    = repFlagError | 6
	repErrShutdown   = repFlagError | 7
	repErrBlockSizes = repFlagError | 8
	repErrTooBig     = repFlagError | 9

	// information types
	infoExport    = 0
	infoName      = 1
	infoBlockSize = 3

	// transmission flags
	tflagHasFlags     = 1 << 0
	tflagReadOnly     = 1 << 1
	tflagSendFlush    = 1 << 2
	tflagSendDF       = 1 << 7
	tflagCanMultiConn = 1 << 8
	tflagSendCache    = 1 << 10

	// commands
	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdCache       = 5
	cmdWriteZeroes = 6
	cmdBlockStatus = 7

	// command flags
	cmdFlagDF     = 1 << 2
	cmdFlagReqOne = 1 << 3

	// structured reply flags and types
	replyFlagDone      = 1 << 0
	replyOffsetData    = 1
	replyOffsetHole    = 2
	replyBlockStatus   = 5
	replyError         = 1<<15 | 1
	replyErrorOffset   = 1<<15 | 2
	stateHole          = 1 << 0 // base:allocation
	stateZero          = 1 << 1
	contextAllocation  = "base:allocation"
	contextAllocID     = 1
	maxStringLen       = 4096
	maxOptionLen       = 64 << 10 // no option we take is longer
	maxOptionsPerConn  = 1000     // an option flood is a denial of service
	maxReplyDescriptor = 1 << 16  // block status descriptors in one reply
)

// NBD errors, as the protocol numbers them.
const (
	errPerm     = 1
	errIO       = 5
	errNoMem    = 12
	errInval    = 22
	errNoSpc    = 28
	errOverflow = 75
	errNotSup   = 95
	errShutdown = 108
)
