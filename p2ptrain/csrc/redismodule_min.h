/*
 * The subset of the Redis module API that p2ptrain_redis.c uses, declared from the documented ABI.
 *
 * Redis binds a module's API at load time: the context passed to RedisModule_OnLoad begins with a
 * pointer to RedisModule_GetApi, which returns each API function by its name ("RedisModule_<Name>").
 * Declaring only what we call keeps the module small and readable.
 */
#ifndef P2PTRAIN_REDISMODULE_MIN_H
#define P2PTRAIN_REDISMODULE_MIN_H

#include <stddef.h>

#define REDISMODULE_OK 0
#define REDISMODULE_ERR 1
#define REDISMODULE_APIVER_1 1

#define REDISMODULE_READ (1 << 0)
#define REDISMODULE_WRITE (1 << 1)

#define REDISMODULE_KEYTYPE_EMPTY 0
#define REDISMODULE_KEYTYPE_STRING 1
#define REDISMODULE_KEYTYPE_HASH 3

#define REDISMODULE_REPLY_STRING 0
#define REDISMODULE_REPLY_ERROR 1
#define REDISMODULE_REPLY_INTEGER 2
#define REDISMODULE_REPLY_ARRAY 3
#define REDISMODULE_REPLY_NULL 4

#define REDISMODULE_CTX_FLAGS_LUA (1 << 0)
#define REDISMODULE_CTX_FLAGS_MULTI (1 << 1)
#define REDISMODULE_CTX_FLAGS_REPLICATED (1 << 12)
#define REDISMODULE_CTX_FLAGS_LOADING (1 << 13)
#define REDISMODULE_CTX_FLAGS_DENY_BLOCKING (1 << 21)

#define REDISMODULE_ERRORMSG_WRONGTYPE "WRONGTYPE Operation against a key holding the wrong kind of value"

typedef struct RedisModuleCtx RedisModuleCtx;
typedef struct RedisModuleKey RedisModuleKey;
typedef struct RedisModuleString RedisModuleString;
typedef struct RedisModuleCallReply RedisModuleCallReply;
typedef struct RedisModuleBlockedClient RedisModuleBlockedClient;
typedef long long mstime_t;
typedef unsigned long long RedisModuleTimerID;
typedef void (*RedisModuleTimerProc)(RedisModuleCtx *ctx, void *data);
typedef int (*RedisModuleCmdFunc)(RedisModuleCtx *ctx, RedisModuleString **argv, int argc);

#define P2P_API(ret, name, ...) static ret (*RedisModule_##name)(__VA_ARGS__)

P2P_API(int, GetApi, const char *, void *);
P2P_API(void, SetModuleAttribs, RedisModuleCtx *, const char *, int, int);
P2P_API(int, IsModuleNameBusy, const char *);
P2P_API(int, CreateCommand, RedisModuleCtx *, const char *, RedisModuleCmdFunc, const char *, int, int, int);
P2P_API(void, AutoMemory, RedisModuleCtx *);
P2P_API(void *, Alloc, size_t);
P2P_API(void, Free, void *);
P2P_API(RedisModuleKey *, OpenKey, RedisModuleCtx *, RedisModuleString *, int);
P2P_API(void, CloseKey, RedisModuleKey *);
P2P_API(int, KeyType, RedisModuleKey *);
P2P_API(size_t, ValueLength, RedisModuleKey *);
P2P_API(char *, StringDMA, RedisModuleKey *, size_t *, int);
P2P_API(int, StringTruncate, RedisModuleKey *, size_t);
P2P_API(int, DeleteKey, RedisModuleKey *);
P2P_API(const char *, StringPtrLen, const RedisModuleString *, size_t *);
P2P_API(int, StringToDouble, const RedisModuleString *, double *);
P2P_API(int, WrongArity, RedisModuleCtx *);
P2P_API(int, ReplyWithError, RedisModuleCtx *, const char *);
P2P_API(int, ReplyWithLongLong, RedisModuleCtx *, long long);
P2P_API(int, ReplyWithNull, RedisModuleCtx *);
P2P_API(int, ReplyWithArray, RedisModuleCtx *, long);
P2P_API(int, ReplyWithStringBuffer, RedisModuleCtx *, const char *, size_t);
P2P_API(int, ReplicateVerbatim, RedisModuleCtx *);
P2P_API(RedisModuleCallReply *, Call, RedisModuleCtx *, const char *, const char *, ...);
P2P_API(int, CallReplyType, RedisModuleCallReply *);
P2P_API(long long, CallReplyInteger, RedisModuleCallReply *);
P2P_API(size_t, CallReplyLength, RedisModuleCallReply *);
P2P_API(const char *, CallReplyStringPtr, RedisModuleCallReply *, size_t *);
P2P_API(RedisModuleCallReply *, CallReplyArrayElement, RedisModuleCallReply *, size_t);

P2P_API(int, SetExpire, RedisModuleKey *, mstime_t);
P2P_API(int, GetContextFlags, RedisModuleCtx *);
P2P_API(int, GetSelectedDb, RedisModuleCtx *);
P2P_API(int, SelectDb, RedisModuleCtx *, int);
P2P_API(void, RetainString, RedisModuleCtx *, RedisModuleString *);
P2P_API(void, FreeString, RedisModuleCtx *, RedisModuleString *);
P2P_API(int, StringCompare, RedisModuleString *, RedisModuleString *);
P2P_API(int, StringToLongLong, const RedisModuleString *, long long *);
P2P_API(RedisModuleBlockedClient *, BlockClient, RedisModuleCtx *, RedisModuleCmdFunc, RedisModuleCmdFunc,
        void (*)(RedisModuleCtx *, void *), long long);
P2P_API(int, UnblockClient, RedisModuleBlockedClient *, void *);
P2P_API(int, BlockedClientMeasureTimeStart, RedisModuleBlockedClient *);
P2P_API(int, BlockedClientMeasureTimeEnd, RedisModuleBlockedClient *);
P2P_API(void *, GetBlockedClientPrivateData, RedisModuleCtx *);
P2P_API(RedisModuleTimerID, CreateTimer, RedisModuleCtx *, mstime_t, RedisModuleTimerProc, void *);

#define P2P_GET_API(name) RedisModule_GetApi("RedisModule_" #name, ((void **)&RedisModule_##name))

static int RedisModule_Init(RedisModuleCtx *ctx, const char *name, int version, int api_version) {
    /* The first word of the load-time context is the GetApi entry point. */
    void *get_api = ((void **)ctx)[0];
    RedisModule_GetApi = (int (*)(const char *, void *))(unsigned long)get_api;
    if (P2P_GET_API(SetModuleAttribs) || P2P_GET_API(CreateCommand) || P2P_GET_API(AutoMemory) ||
        P2P_GET_API(Alloc) || P2P_GET_API(Free) || P2P_GET_API(OpenKey) || P2P_GET_API(CloseKey) ||
        P2P_GET_API(KeyType) || P2P_GET_API(ValueLength) || P2P_GET_API(StringDMA) ||
        P2P_GET_API(StringTruncate) || P2P_GET_API(DeleteKey) || P2P_GET_API(StringPtrLen) || P2P_GET_API(StringToDouble) ||
        P2P_GET_API(WrongArity) || P2P_GET_API(ReplyWithError) || P2P_GET_API(ReplyWithLongLong) ||
        P2P_GET_API(ReplyWithNull) || P2P_GET_API(ReplyWithArray) || P2P_GET_API(ReplyWithStringBuffer) ||
        P2P_GET_API(ReplicateVerbatim) || P2P_GET_API(Call) || P2P_GET_API(CallReplyType) ||
        P2P_GET_API(CallReplyInteger) || P2P_GET_API(CallReplyLength) || P2P_GET_API(CallReplyStringPtr) ||
        P2P_GET_API(CallReplyArrayElement) || P2P_GET_API(SetExpire) || P2P_GET_API(GetContextFlags) ||
        P2P_GET_API(GetSelectedDb) || P2P_GET_API(SelectDb) || P2P_GET_API(RetainString) ||
        P2P_GET_API(FreeString) || P2P_GET_API(StringCompare) || P2P_GET_API(StringToLongLong) ||
        P2P_GET_API(BlockClient) || P2P_GET_API(UnblockClient) || P2P_GET_API(GetBlockedClientPrivateData) ||
        P2P_GET_API(CreateTimer) || P2P_GET_API(BlockedClientMeasureTimeStart) ||
        P2P_GET_API(BlockedClientMeasureTimeEnd))
        return REDISMODULE_ERR;
    /* Optional in old servers: only refuse to load twice when the server can tell us. */
    if (P2P_GET_API(IsModuleNameBusy) == REDISMODULE_OK && RedisModule_IsModuleNameBusy(name))
        return REDISMODULE_ERR;
    RedisModule_SetModuleAttribs(ctx, name, version, api_version);
    return REDISMODULE_OK;
}

#endif
