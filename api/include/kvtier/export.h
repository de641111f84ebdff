/* Marks what libkvtier_client.so exports. The library is built with hidden visibility, so only
 * what carries KVTIER_API (the public headers' classes and functions) is part of its ABI. Plain C,
 * so the C header can use it too. */
#ifndef KVTIER_EXPORT_H_
#define KVTIER_EXPORT_H_

#if defined(__GNUC__) || defined(__clang__)
#define KVTIER_API __attribute__((visibility("default")))
#else
#define KVTIER_API
#endif

#endif /* KVTIER_EXPORT_H_ */
