/**
 * Minimal Windows BMP decoder. The prebuilt libvips inside sharp cannot read
 * BMP, so the pipeline decodes the common uncompressed variants itself:
 * 1/4/8-bit palettes, 16-bit (5-5-5 or bit fields), 24-bit BGR and 32-bit
 * (BGRX or bit fields). RLE-compressed files are rejected with an error.
 * Output is always 8-bit RGB (alpha, if any, is dropped like PIL's
 * `convert('RGB')`).
 */

export interface DecodedBmp {
  width: number;
  height: number;
  channels: 3;
  pixels: Uint8Array;
}

const BI_RGB = 0;
const BI_BITFIELDS = 3;
const BI_ALPHABITFIELDS = 6;
const MAX_PIXELS = 1 << 28;

/** True when the buffer starts with the BMP signature "BM". */
export function isBmp(buf: Uint8Array): boolean {
  return buf.length >= 2 && buf[0] === 0x42 && buf[1] === 0x4d;
}

interface Channel {
  mask: number;
  shift: number;
  max: number;
}

function channelOf(mask: number): Channel {
  mask >>>= 0;
  if (mask === 0) return { mask: 0, shift: 0, max: 0 };
  let shift = 0;
  while (((mask >>> shift) & 1) === 0) shift++;
  let bits = 0;
  while (shift + bits < 32 && ((mask >>> (shift + bits)) & 1) === 1) bits++;
  return { mask, shift, max: bits >= 32 ? 0xffffffff : 2 ** bits - 1 };
}

function extract(px: number, ch: Channel): number {
  if (ch.max === 0) return 0;
  const v = (px & ch.mask) >>> ch.shift;
  return ch.max === 255 ? v : Math.round((v * 255) / ch.max);
}

export function decodeBmp(buf: Uint8Array): DecodedBmp {
  if (!isBmp(buf)) throw new Error('not a BMP file (missing "BM" signature)');
  if (buf.length < 26) throw new Error('BMP file is truncated (header incomplete)');
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const dataOffset = view.getUint32(10, true);
  const headerSize = view.getUint32(14, true);
  let width: number;
  let rawHeight: number;
  let bpp: number;
  let compression = BI_RGB;
  let colorsUsed = 0;
  let paletteEntrySize = 4;
  if (headerSize === 12) {
    width = view.getUint16(18, true);
    rawHeight = view.getInt16(20, true);
    bpp = view.getUint16(24, true);
    paletteEntrySize = 3;
  } else if (headerSize >= 40) {
    if (buf.length < 14 + 40) throw new Error('BMP file is truncated (header incomplete)');
    width = view.getInt32(18, true);
    rawHeight = view.getInt32(22, true);
    bpp = view.getUint16(28, true);
    compression = view.getUint32(30, true);
    colorsUsed = view.getUint32(46, true);
  } else {
    throw new Error(`unsupported BMP header size ${headerSize}`);
  }
  const topDown = rawHeight < 0;
  const height = Math.abs(rawHeight);
  if (width <= 0 || height <= 0) throw new Error(`invalid BMP dimensions ${width}x${rawHeight}`);
  if (width * height > MAX_PIXELS) throw new Error(`BMP dimensions ${width}x${height} are too large`);

  let masks: [number, number, number] | undefined;
  let paletteStart = 14 + headerSize;
  if (compression === BI_BITFIELDS || compression === BI_ALPHABITFIELDS) {
    if (bpp !== 16 && bpp !== 32) throw new Error(`BMP bit fields with ${bpp} bits per pixel are not supported`);
    if (headerSize >= 52) {
      masks = [view.getUint32(54, true), view.getUint32(58, true), view.getUint32(62, true)];
    } else {
      // Masks follow a 40-byte header.
      const n = compression === BI_ALPHABITFIELDS ? 4 : 3;
      if (buf.length < paletteStart + 4 * n) throw new Error('BMP file is truncated (bit masks missing)');
      masks = [view.getUint32(paletteStart, true), view.getUint32(paletteStart + 4, true), view.getUint32(paletteStart + 8, true)];
      paletteStart += 4 * n;
    }
  } else if (compression !== BI_RGB) {
    throw new Error(`compressed BMP (compression type ${compression}) is not supported`);
  }

  let palette: Uint8Array | undefined;
  if (bpp === 1 || bpp === 4 || bpp === 8) {
    const entries = colorsUsed > 0 && colorsUsed <= 1 << bpp ? colorsUsed : 1 << bpp;
    const end = paletteStart + entries * paletteEntrySize;
    if (end > buf.length) throw new Error('BMP file is truncated (palette incomplete)');
    palette = new Uint8Array((1 << bpp) * 3);
    for (let i = 0; i < entries; i++) {
      const p = paletteStart + i * paletteEntrySize;
      palette[i * 3] = buf[p + 2];
      palette[i * 3 + 1] = buf[p + 1];
      palette[i * 3 + 2] = buf[p];
    }
  } else if (bpp !== 16 && bpp !== 24 && bpp !== 32) {
    throw new Error(`BMP with ${bpp} bits per pixel is not supported`);
  }

  const stride = Math.floor((bpp * width + 31) / 32) * 4;
  // The last row only needs its pixel bytes, not the padding.
  const needed = dataOffset + stride * (height - 1) + Math.ceil((bpp * width) / 8);
  if (dataOffset < 14 + headerSize || needed > buf.length) {
    throw new Error(`BMP file is truncated (pixel data needs ${needed} bytes, file has ${buf.length})`);
  }

  let channels: [Channel, Channel, Channel] | undefined;
  if (bpp === 16) {
    const m = masks ?? [0x7c00, 0x03e0, 0x001f];
    channels = [channelOf(m[0]), channelOf(m[1]), channelOf(m[2])];
  } else if (bpp === 32 && masks) {
    channels = [channelOf(masks[0]), channelOf(masks[1]), channelOf(masks[2])];
  }

  const out = new Uint8Array(width * height * 3);
  for (let y = 0; y < height; y++) {
    const row = dataOffset + (topDown ? y : height - 1 - y) * stride;
    let o = y * width * 3;
    if (palette) {
      const perByte = 8 / bpp;
      const mask = (1 << bpp) - 1;
      for (let x = 0; x < width; x++) {
        const byte = buf[row + Math.floor(x / perByte)];
        const shift = 8 - bpp * ((x % perByte) + 1);
        const idx = (byte >>> shift) & mask;
        out[o++] = palette[idx * 3];
        out[o++] = palette[idx * 3 + 1];
        out[o++] = palette[idx * 3 + 2];
      }
    } else if (bpp === 24 || (bpp === 32 && !channels)) {
      const step = bpp / 8;
      for (let x = 0, p = row; x < width; x++, p += step) {
        out[o++] = buf[p + 2];
        out[o++] = buf[p + 1];
        out[o++] = buf[p];
      }
    } else {
      const [r, g, b] = channels!;
      for (let x = 0; x < width; x++) {
        const px = bpp === 16 ? view.getUint16(row + x * 2, true) : view.getUint32(row + x * 4, true);
        out[o++] = extract(px, r);
        out[o++] = extract(px, g);
        out[o++] = extract(px, b);
      }
    }
  }
  return { width, height, channels: 3, pixels: out };
}
