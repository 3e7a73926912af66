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

#define REDISMODULE_ERRORMSG_WRONGTYPE "WRONGTYPE Operation against a key holding the wrong kind of value"

typedef struct RedisModuleCtx RedisModuleCtx;
typedef struct RedisModuleKey RedisModuleKey;
typedef struct RedisModuleString RedisModuleString;
typedef struct RedisModuleCallReply RedisModuleCallReply;
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

#define P2P_GET_API(name) RedisModule_GetApi("RedisModule_" #name, ((void **)&RedisModule_##name))

static int RedisModule_Init(RedisModuleCtx *ctx, const char *name, int version, int api_version) {
    /* The first word of the load-time context is the GetApi entry point. */
    void *get_api = ((void **)ctx)[0];
    RedisModule_GetApi = (int (*)(const char *, void *))(unsigned long)get_api;
    if (P2P_GET_API(SetModuleAttribs) || P2P_GET_API(CreateCommand) || P2P_GET_API(AutoMemory) ||
        P2P_GET_API(Alloc) || P2P_GET_API(Free) || P2P_GET_API(OpenKey) || P2P_GET_API(CloseKey) ||
        P2P_GET_API(KeyType) || P2P_GET_API(ValueLength) || P2P_GET_API(StringDMA) ||
        P2P_GET_API(StringTruncate) || P2P_GET_API(StringPtrLen) || P2P_GET_API(StringToDouble) ||
        P2P_GET_API(WrongArity) || P2P_GET_API(ReplyWithError) || P2P_GET_API(ReplyWithLongLong) ||
        P2P_GET_API(ReplyWithNull) || P2P_GET_API(ReplyWithArray) || P2P_GET_API(ReplyWithStringBuffer) ||
        P2P_GET_API(ReplicateVerbatim) || P2P_GET_API(Call) || P2P_GET_API(CallReplyType) ||
        P2P_GET_API(CallReplyInteger) || P2P_GET_API(CallReplyLength) || P2P_GET_API(CallReplyStringPtr) ||
        P2P_GET_API(CallReplyArrayElement))
        return REDISMODULE_ERR;
    /* Optional in old servers: only refuse to load twice when the server can tell us. */
    if (P2P_GET_API(IsModuleNameBusy) == REDISMODULE_OK && RedisModule_IsModuleNameBusy(name))
        return REDISMODULE_ERR;
    RedisModule_SetModuleAttribs(ctx, name, version, api_version);
    return REDISMODULE_OK;
}

#endif
