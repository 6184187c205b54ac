/**
 * A small reader of tar archives (POSIX ustar, pax extended headers, GNU
 * long names), enough for WebDataset shards: it lists the regular files of
 * an archive with the byte range of their contents, reading only the
 * 512-byte headers (and the few small pax / long-name records), never the
 * file contents.
 */
import { open, type FileHandle } from 'node:fs/promises';

const BLOCK = 512;

export interface TarMember {
  /** Path inside the archive. */
  name: string;
  /** Byte offset of the contents in the archive file. */
  offset: number;
  size: number;
  /** The contents, for members that `listTar`'s `keepContents` selected. */
  contents?: Uint8Array;
}

export interface ListTarOptions {
  /** Members whose contents to read while listing (small ones, such as WebDataset labels). */
  keepContents?: (name: string, size: number) => boolean;
}

function ascii(block: Uint8Array, start: number, length: number): string {
  let end = start;
  while (end < start + length && block[end] !== 0) end++;
  return Buffer.from(block.buffer, block.byteOffset + start, end - start).toString('utf8');
}

/** A numeric header field: octal text, or GNU base-256 when the top bit is set. */
function numberField(block: Uint8Array, start: number, length: number): number {
  if (block[start] & 0x80) {
    let value = block[start] & 0x7f;
    for (let i = 1; i < length; i++) value = value * 256 + block[start + i];
    return value;
  }
  const text = ascii(block, start, length).trim();
  if (text === '') return 0;
  if (!/^[0-7]+$/.test(text)) throw new Error(`bad octal field "${text}"`);
  return parseInt(text, 8);
}

function checksumOk(block: Uint8Array): boolean {
  let stored: number;
  try {
    stored = numberField(block, 148, 8);
  } catch {
    return false; // not even a number where the checksum belongs
  }
  let sum = 0;
  for (let i = 0; i < BLOCK; i++) sum += i >= 148 && i < 156 ? 0x20 : block[i];
  return sum === stored;
}

/** Records "LEN key=value\n" of a pax extended header. */
function parsePax(data: Uint8Array): Map<string, string> {
  const text = Buffer.from(data.buffer, data.byteOffset, data.byteLength).toString('utf8');
  const out = new Map<string, string>();
  let pos = 0;
  while (pos < text.length) {
    const space = text.indexOf(' ', pos);
    if (space < 0) break;
    const length = Number(text.slice(pos, space));
    if (!Number.isInteger(length) || length <= 0) break;
    const record = text.slice(space + 1, pos + length - 1); // without the trailing newline
    const eq = record.indexOf('=');
    if (eq > 0) out.set(record.slice(0, eq), record.slice(eq + 1));
    pos += length;
  }
  return out;
}

async function readAt(handle: FileHandle, position: number, length: number): Promise<Uint8Array> {
  const buf = new Uint8Array(length);
  let done = 0;
  while (done < length) {
    const { bytesRead } = await handle.read(buf, done, length - done, position + done);
    if (bytesRead === 0) break;
    done += bytesRead;
  }
  return done === length ? buf : buf.subarray(0, done);
}

/**
 * Lists the regular files of the tar archive `file`, in archive order.
 * Directories, links and other entry types are passed over. Throws (naming
 * the file and the offset) on a damaged header or an archive cut short.
 */
export async function listTar(file: string, options: ListTarOptions = {}): Promise<TarMember[]> {
  const handle = await open(file, 'r');
  try {
    const { size: fileSize } = await handle.stat();
    const members: TarMember[] = [];
    let pos = 0;
    let paxPath: string | undefined;
    let paxSize: number | undefined;
    let longName: string | undefined;
    while (pos + BLOCK <= fileSize) {
      const header = await readAt(handle, pos, BLOCK);
      if (header.length < BLOCK) break;
      if (header.every((b) => b === 0)) break; // end-of-archive marker
      const where = `tar "${file}" at byte ${pos}`;
      if (!checksumOk(header)) throw new Error(`${where}: header checksum mismatch (not a tar file, or damaged)`);
      const type = String.fromCharCode(header[156] || 0x30);
      let size: number;
      try {
        size = numberField(header, 124, 12);
      } catch (err) {
        throw new Error(`${where}: ${(err as Error).message}`);
      }
      const dataStart = pos + BLOCK;
      if (type === 'x' || type === 'L') {
        // Records that apply to the next entry.
        const data = await readAt(handle, dataStart, size);
        if (data.length < size) throw new Error(`${where}: archive ends inside an extended header`);
        if (type === 'L') {
          longName = ascii(data, 0, data.length);
        } else {
          const pax = parsePax(data);
          paxPath = pax.get('path');
          const s = pax.get('size');
          paxSize = s !== undefined ? Number(s) : undefined;
        }
      } else {
        if (paxSize !== undefined) size = paxSize;
        if (type === '0' || type === '7') {
          const magic = ascii(header, 257, 5);
          const prefix = magic === 'ustar' ? ascii(header, 345, 155) : '';
          const base = ascii(header, 0, 100);
          const name = paxPath ?? longName ?? (prefix ? `${prefix}/${base}` : base);
          if (dataStart + size > fileSize) throw new Error(`${where}: "${name}" (${size} bytes) runs past the end of the archive`);
          const member: TarMember = { name, offset: dataStart, size };
          if (options.keepContents?.(name, size)) member.contents = await readAt(handle, dataStart, size);
          members.push(member);
        }
        paxPath = undefined;
        paxSize = undefined;
        longName = undefined;
      }
      // 'g' (pax global header) and all other entry types are skipped.
      pos = dataStart + Math.ceil(size / BLOCK) * BLOCK;
    }
    return members;
  } finally {
    await handle.close();
  }
}

/** Reads `length` bytes of `file` at `offset` (a tar member's contents). */
export async function readRange(file: string, offset: number, length: number): Promise<Uint8Array> {
  const handle = await open(file, 'r');
  try {
    const data = await readAt(handle, offset, length);
    if (data.length < length) throw new Error(`"${file}" ends before byte ${offset + length}`);
    return data;
  } finally {
    await handle.close();
  }
}
